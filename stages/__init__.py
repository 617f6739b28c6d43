"""The DVC pipeline's stage entry points (see dvc.yaml and README.md, "The DVC pipeline").

`python -m stages COMMAND ARGS...` runs `qks COMMAND --params params.yaml ARGS...`: each stage binds
the pipeline's params.yaml to the one implementation of a command in `qks_pipeline.cli`, so a stage
and the CLI can never drift apart. Paths come from dvc.yaml; hyperparameters from params.yaml.
Nothing here has logic of its own.
"""
