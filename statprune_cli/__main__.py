from statprune_cli.cli import main

main()
