"""The compiler passes: trace, shape_prop, find_chains, validate, rewrite, pipeline, dynamo."""
