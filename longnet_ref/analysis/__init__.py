"""Pictures and numbers about the pattern: complexity, dependency_paths, viz, widgets, figures, results."""
