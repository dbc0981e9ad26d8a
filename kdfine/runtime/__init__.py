"""kdfine.runtime."""
