use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = rewind::cli::Cli::parse();
    if let Err(err) = rewind::cli::run(cli) {
        eprintln!("rewind: {err:#}");
        std::process::exit(1);
    }
}
