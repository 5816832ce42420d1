"""Small numerical operations shared by models/, diffusion/ and data/ (imports nothing from them)."""
