"""Per-request policies: authentication, limits, budgets, accounting."""
