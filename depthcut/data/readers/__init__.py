"""File formats, each in its own module: what a dataset file reads its arrays with."""
