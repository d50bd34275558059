"""What a stored sparse-convolution kernel computes: layouts, axis order, live sparse-conv
modules, and ``verify``, the proof by function."""
