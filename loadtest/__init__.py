"""batchserve's load-test harness (see issue 7)."""
