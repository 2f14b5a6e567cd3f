"""The config: the runner's schemas, the checks that turn a composed config into settings,
and where the YAML files live."""
