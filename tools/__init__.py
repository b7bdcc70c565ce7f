"""Development tools (not part of the product): the docs' configuration-table generator."""
