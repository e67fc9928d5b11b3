"""ZoomMIL (Thandiackal 2022): attention MIL over several magnifications that learns where to zoom, so that a
prediction reads and encodes only the children of the patches it selects. One method family."""
