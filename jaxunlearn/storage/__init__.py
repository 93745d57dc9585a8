"""Where inputs and outputs live: local paths and storage URLs, and atomic file writes."""
