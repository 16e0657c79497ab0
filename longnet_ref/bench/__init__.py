"""`python -m longnet_ref.bench`: measured cost of dilated attention (`__main__` the sections, `measure`,
`floor` the kernel floor) and its reports (`report`)."""
