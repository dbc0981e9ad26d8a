"""kdfine.inference."""
