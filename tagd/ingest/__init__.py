"""Files to jobs: the watcher, the reconcile scan and the include/exclude filters."""
