"""Quantization: round-to-nearest, GPTQ, SmoothQuant, and the integer grids every path shares."""
