"""Tools around the product, run by the CLI but not part of the data flow: the demo and the
benchmarks."""
