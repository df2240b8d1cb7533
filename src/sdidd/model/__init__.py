"""The GFLv1 detector: backbone, FPN, head, ATSS assignment, losses and post-processing."""
