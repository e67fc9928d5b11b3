"""What a user drives: the interactive session over a project, training with live maps in a child
process, and the ``wsimil`` train/predict/evaluate commands. Everything here works for any method
family (:mod:`napari_wsimil.train.family`); the widgets in ``_qt`` are views over it."""
