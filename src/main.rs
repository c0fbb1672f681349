use clap::Parser;

fn main() {
    rewind::log_limit::init();
    let cli = rewind::cli::Cli::parse();
    let result = rewind::cli::run(cli);
    // Reports the log lines the rate limit held back.
    log::logger().flush();
    if let Err(err) = result {
        eprintln!("rewind: {err:#}");
        std::process::exit(1);
    }
}
