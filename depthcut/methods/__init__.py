"""Depth-reduction methods: each file holds only what makes its method; the loop is shared."""
