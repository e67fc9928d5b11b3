"""Federated training across sites (hospitals) whose slides never leave them: HistoFL (attention MIL with
noisy weighted averaging, optionally DP-SGD) and FedMix (mixed-supervision segmentation).

The methods (:mod:`.protocol`) are plain Python, apart from Flower: a site's local training and the server's
aggregation. The Flower apps run them on Flower's deployment engine (a SuperLink and one SuperNode per site).
"""
