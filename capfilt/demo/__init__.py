"""A self-contained demo domain (coloured shapes), tiny BLIP models trained on it, and example web data."""
