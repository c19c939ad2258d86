"""The mammography lesion finder: a small fully convolutional heat-map network over whole mammograms."""
