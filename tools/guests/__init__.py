"""The guest image builder: the tiny and Linux guests the tests and local runs boot."""
