"""The audit: the result table and its summary, its on-disk format and reader, the writers (CSV, JSON,
HTML), applying a review, and scoring an audit against known truth."""
