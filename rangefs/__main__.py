from rangefs.cli import main
import sys
sys.exit(main())
