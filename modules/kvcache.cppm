// kvcache: the umbrella module. `import kvcache;` gives every public entity
// of the library; each component can also be imported alone (see
// docs/modules.md for the module <-> target table).
export module kvcache;

export import kvcache.units;
export import kvcache.config;
export import kvcache.errors;
export import kvcache.storage;
export import kvcache.allocator;
export import kvcache.basic;
export import kvcache.prefix;
export import kvcache.paged;
