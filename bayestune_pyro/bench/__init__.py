"""`bayestune bench`: methods × tasks × seeds × budgets through one pipeline, resumable, rendered like Table 1."""
