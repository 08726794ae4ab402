"""Identity: one pseudonymous person across departments and channels, with reversible merges."""
