from wsconvert.cli.app import main

main()
