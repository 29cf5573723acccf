"""Money: the price catalog and performance profiles (data with source and date), budgets, the ledger."""
