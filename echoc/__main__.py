from echoc.cli import main

main()
