from decodiff_cli.cli import main

main()
