"""kdfine.files."""
