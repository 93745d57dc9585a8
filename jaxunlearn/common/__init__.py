"""Small helpers every part shares (leaves: they import nothing of jaxunlearn's)."""
