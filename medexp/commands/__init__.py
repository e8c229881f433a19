"""The work of each `medexp` command other than train (which is medexp.run): params, evaluate, predict,
data check and the MLflow UI. medexp.cli wires them to the command line."""
