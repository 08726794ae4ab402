"""The Alembic environment and revision template that every service shares."""
