"""The query index: the head's label-agnostic query outputs of a whole collection, stored once
and scored against any vocabulary in one matrix product (`qks index`, `qks tag`, `qks search`,
`qks serve`, `qks evaluate --index`)."""
