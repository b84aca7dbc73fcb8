"""python -m benchmarks -> benchmarks.run.main()."""

from benchmarks.run import main

raise SystemExit(main())
