"""`python -m longnet_ref.bench`: measured cost of dilated attention (`__main__`) and its reports (`report`)."""
