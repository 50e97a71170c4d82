"""Data stage: sources -> rows -> one conversation form -> tokens with exact loss masks."""
