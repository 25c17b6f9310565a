"""Pure nn.Modules and tensor functions for token reduction (no Lightning, no histotoken imports)."""
