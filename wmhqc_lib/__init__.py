"""wmhqc: quality control of WMH segmentation."""
