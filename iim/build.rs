// The migrations of `sql/` are compiled into the crate (`sqlx::migrate!`):
// a new or changed migration must rebuild it, which cargo does not know
// on its own.
fn main() {
    println!("cargo:rerun-if-changed=../sql/sqlite");
    println!("cargo:rerun-if-changed=../sql/mysql");
}
