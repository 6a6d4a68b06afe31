"""The search and the fine-tune: the two halves of an unlearning run, and their sharding."""
