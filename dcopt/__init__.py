"""dcopt."""
