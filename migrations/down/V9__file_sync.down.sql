DROP TABLE datasource_file_sync;
