"""Safe wrappers, one module per kernel object. Each resource owns one fd or mapping."""
