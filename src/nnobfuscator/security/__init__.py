"""Secret keys and what is derived from them."""
