from caploc.cli import main

main()
