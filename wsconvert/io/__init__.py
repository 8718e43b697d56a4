"""Reading inputs from disk."""
