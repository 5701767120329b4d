"""One-off experiments kept for their results: README.md here lists what each measured and its verdict."""
